import FuzzDriver

runFuzzer(.nbdServer)
