"""`meshtui bench`: measure speed on the same path as `meshtui up`.

- `compare`: one fixed prompt set, greedy, through every mode (the head alone, the mesh over SSH, plain TCP
  stages), side by side;
- `sweeps`: decode speed against round-trip time (slow-link relays in front of the hosts), with and without
  speculation, and against the number of requests in flight;
- `modes` brings a mode up and measures its replies (`timing`), `report` and `plot` render the JSON.
"""

from meshtui.bench.compare import BenchOptions, run_bench
from meshtui.bench.flags import parse_concurrency, parse_rtt, parse_speculative
from meshtui.bench.plot import render_svg, render_sweep_svg, write_outputs
from meshtui.bench.report import render_sweep_table, render_table
from meshtui.bench.sweeps import SweepOptions, run_sweeps
from meshtui.bench.tcpstats import parse_ss, parse_tcp_stages

__all__ = ["BenchOptions", "SweepOptions", "parse_concurrency", "parse_rtt", "parse_speculative", "parse_ss",
           "parse_tcp_stages", "render_svg", "render_sweep_svg", "render_sweep_table", "render_table", "run_bench",
           "run_sweeps", "write_outputs"]
