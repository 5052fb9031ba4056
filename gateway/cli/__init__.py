"""Command-line entry points: ``hsmgw`` (server, fleet) and ``hsmctl`` (admin)."""
