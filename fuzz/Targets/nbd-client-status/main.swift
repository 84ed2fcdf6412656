import FuzzDriver

runFuzzer(.nbdClientStatus)
