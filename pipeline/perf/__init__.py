"""Predict, measure and draw: simulator, stage timing, profiles, step overhead, plan tables, benchmarks."""
