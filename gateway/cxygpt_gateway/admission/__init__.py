"""Admission: who may ask, what they may ask, how much and when (pure parts with injectable clocks)."""
