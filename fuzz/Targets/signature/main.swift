import FuzzDriver

runFuzzer(.signature)
