"""The secrets the bad-input cases plant: one in the environment, one in storage options and URIs. Neither may
appear in any output."""

ENV_SECRET = "envsecret-9f8e7d6c5b4a"  # planted as NESTA_PLANTED_TOKEN in every case's environment
SO_SECRET = "sosecret-1a2b3c4d5e6f"  # planted in storage_options and URIs by the cases that can hold one
KEY = "AKIAPLANTEDKEY00"  # an access key id planted beside SO_SECRET
SECRETS = (ENV_SECRET, SO_SECRET)
