"""The packcache dashboard (``packcache-dashboard``): attention statistics, fitted decay, budget, and the
compact-cache runtime side by side.

* :mod:`dashboard.sources` -- loads statistics, budget and recorded runs (the embedded defaults live in one table,
  ``DEFAULTS``), fits the decay with :mod:`packcache.fit` and computes keep maps with the PackCache policy;
* :mod:`dashboard.figures` -- pure functions, result objects -> plotly figures (usable without the app);
* :mod:`dashboard.runner` -- background generation runs started from the page;
* :mod:`dashboard.app` -- the Dash wiring and the command line;
* :mod:`dashboard.examples` -- small example inputs made with the real probes on a random demo model.
"""
