"""Benchmarks of thsrn-workbench (run with ``python -m benchmarks.run`` or ``make bench``).

Measurements, not tests: nothing here asserts timings. Results go to stdout and
``benchmarks/results/*.json``; ``benchmarks/README.md`` records the numbers measured on the
project's reference machine.
"""
