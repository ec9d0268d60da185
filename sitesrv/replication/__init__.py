"""Replication: the primary's change-log server and the site's replica client (port 9192)."""
