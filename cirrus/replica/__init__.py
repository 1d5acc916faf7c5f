"""The replica process: loads one predictor and serves it to the gateway."""
