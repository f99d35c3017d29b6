"""Run reports: markdown tables (``markdown``), PNG plots (``plots``) and one self-contained HTML page (``html``)."""
