"""Sequence-parallel attention, one file per idea: ulysses (all-to-all between sequence and head shards) and
ring (K/V blocks passed around a ring, merged exactly by log-sum-exp)."""
