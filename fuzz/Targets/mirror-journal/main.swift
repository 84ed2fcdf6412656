import FuzzDriver

runFuzzer(.mirrorJournal)
