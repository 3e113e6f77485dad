"""The lab around the library: the studies behind the notebooks and the report (misalignment,
convergence, benchmarks, profiling, guidance evaluation), their figures, ``sagkit report`` and
the ``sagkit`` command line."""
