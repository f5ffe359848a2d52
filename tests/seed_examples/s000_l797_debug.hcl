# seed: 000 797-798
# Seed 000, "Debugging Steps" > "Enable Debug Logging": agent options, loaded by the ch agent
# of test_seed_000_ch.py as one more -config file, unchanged.

log_level = "DEBUG"
enable_debug = true
