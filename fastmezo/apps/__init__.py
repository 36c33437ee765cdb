"""Example applications built on fastmezo (run them with ``python -m fastmezo <app>``)."""
