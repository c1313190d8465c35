"""Serving: one frozen base per replica, any number of adapters of any method, chosen per request."""
