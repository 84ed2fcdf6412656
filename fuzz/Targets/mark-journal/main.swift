import FuzzDriver

runFuzzer(.markJournal)
