"""The paper's evaluation: metrics, the benchmark, ranking and calibrated confidence."""
