"""`onebase sweep`: Ray Tune over tuning methods and their hyperparameters, one report at the end."""
