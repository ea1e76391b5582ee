"""One module per scenario; each exposes ``run(sizes, shared) -> ScenarioResult``."""
