import FuzzDriver

runFuzzer(.mergeExport)
