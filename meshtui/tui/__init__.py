"""The terminal UI. Only this package imports Textual; it renders the core's events and never decides anything."""
