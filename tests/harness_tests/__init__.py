"""The test harness itself (tests/harness/): its servers, images and lifecycle."""
