"""The NBD wire under hostile input, against the real daemon (docs/fuzzing.md).

``python -m tests.fuzz --mode target|cow|proxy|wrapper --inputs N --seed S`` runs it; the short
mode is tests/e2e/test_fuzz.py.
"""
