"""What every protocol adapter shares: body parsing and schemas, method decorators, relays and the
stream scanners that read token counts out of replies passed through untouched."""
