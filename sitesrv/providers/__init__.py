"""Print providers: the AMP protocol on port 9191 (commands and the server side)."""
