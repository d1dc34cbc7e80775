"""The terminal dashboard over a run store (``mtrl dash [RUN]``, ``make dash RUN=…``).

``app`` places the widgets and polls the store off the UI thread; ``data`` reads the store;
``health``, ``curves``, ``reports`` and ``trajectories`` turn records into what each view shows
(plain functions, no Textual); ``browser`` is the trajectory browser widget; ``demo`` writes a
demo run from the scripted policies; ``screenshots`` saves an SVG of each view. The trainer never
imports this package.
"""
