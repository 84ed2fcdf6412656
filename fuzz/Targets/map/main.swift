import FuzzDriver

runFuzzer(.map)
