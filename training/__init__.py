"""Local training, shared by both roles: the silo trains with it, the coordinator pre-trains.

``loop`` holds the batch loop and optimizers, ``trainers`` the FedAvg-style trainers and the
registry built from a config, ``lss`` Local Superior Soups. Nothing here knows about gRPC,
the coordinator or the silo daemon.
"""
