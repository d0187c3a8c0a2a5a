"""Observability: what the control process shows of the data plane (status, and later metrics,
access logs and the live view)."""
