import FuzzDriver

runFuzzer(.nbdClient)
