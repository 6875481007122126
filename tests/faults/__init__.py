"""Fault-injection scenarios (see conftest.py); run with `make faults`."""
