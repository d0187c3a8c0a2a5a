"""The client talks to the backend itself: no balancer, the ceiling of the load side."""

NAME = "direct"
LABEL = "direct (no balancer)"
ORDER = 10
BALANCER = False
