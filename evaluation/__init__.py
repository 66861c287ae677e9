"""Research tooling outside the wheel: task accuracy, decode-time fidelity, needles, the server's soak and load runs."""
