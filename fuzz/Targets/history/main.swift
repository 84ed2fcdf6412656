import FuzzDriver

runFuzzer(.history)
