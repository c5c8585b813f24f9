"""The shared vocabulary every stage uses: clocks, the chunk and its wire form, reject reasons,
counters."""
