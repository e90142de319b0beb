"""Shared fixtures. Integration tests share one real stack and one set of workers per session
(starting them costs seconds: the broker's consumer-group join); every test uses fresh random
account and transfer ids, so tests never see each other's money."""
