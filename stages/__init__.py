"""featcache stages: stage one (extraction), stage two (heads) and what builds on them."""
