"""Delivery: the queue worker, the ways out (relay or MX), outcomes and bounce reports (SPEC §5)."""
