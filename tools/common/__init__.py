"""The ground floor of ``tools/``: what several tools above share (the demo, the experiments). Imports nothing from
``tools/``; ``tests/test_tools_layers.py`` keeps every import of ``tools/`` going down its floors."""
