import FuzzDriver

runFuzzer(.mirrorPositions)
