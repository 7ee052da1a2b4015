"""Watching served traffic: drift statistics against the champion's training data and earlier traffic."""
