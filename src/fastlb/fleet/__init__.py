"""Running fastlb as one of a fleet: DNS service discovery (discovery.py), the remote admin API
(admin.py, served by the control process; client.py, what the CLI talks to it with) and the
`fastlb fleet` fan-out (fanout.py)."""
