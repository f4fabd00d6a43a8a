"""Test-session settings: nothing in the suite may reach the network (the Hub paths are tested
against local folders and a Hub-shaped cache), whatever the caller's environment says."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
