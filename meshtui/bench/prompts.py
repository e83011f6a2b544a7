"""The sweeps' chat prompts: texts the model copies, and questions with nothing to copy."""

from __future__ import annotations

# Chat prompts the model does copy (the kind speculation over the conversation so far is for) ...
COPY_PROMPTS: tuple[str, ...] = (
    "Repeat the following list exactly, one item per line:\nMercury\nVenus\nEarth\nMars\nJupiter\nSaturn\n"
    "Uranus\nNeptune\nCeres\nPluto\nHaumea\nMakemake\nEris\nSedna\nQuaoar\nOrcus\nGonggong\nVaruna",
    "Repeat the following text exactly: The lighthouse keeper climbed the stairs every evening at dusk, "
    "lit the great lamp, and watched the ships pass safely along the rocky coast until the sun rose again. "
    "In winter the storms came from the north, and the waves broke over the harbour wall, but the light never "
    "failed, and the sailors of the village said that the keeper did not sleep until every boat was home.",
    "Repeat this code exactly:\ndef area(width, height):\n    return width * height\n\n\n"
    "def perimeter(width, height):\n    return 2 * (width + height)\n\n\n"
    "def diagonal(width, height):\n    return (width ** 2 + height ** 2) ** 0.5\n\n\n"
    "def is_square(width, height):\n    return width == height\n",
)
# ... and prompts with nothing to copy (where speculation must cost nothing).
FREE_PROMPTS: tuple[str, ...] = (
    "Write a short poem about the sea.",
    "Give three tips for someone learning to cook.",
    "Why is the sky blue? Answer in two sentences.",
)
PROMPT_SETS = {"copy": COPY_PROMPTS, "free": FREE_PROMPTS}
