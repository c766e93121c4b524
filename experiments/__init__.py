"""Paper reproductions (``learning_dynamics``, ``freeze_training``, ``compare_networks``,
``class_sensitivity``, ``compression``) and benchmarks (``bench_*``). Each is a script with
``--help``; the reproductions are also importable (``run(args) -> dict``)."""
