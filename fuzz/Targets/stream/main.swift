import FuzzDriver

runFuzzer(.stream)
