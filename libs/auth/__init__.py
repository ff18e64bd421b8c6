"""Who is asking: verified bearer tokens, roles bound to a vehicle, facility or site, and the
one policy per service that says who may do what."""
