"""The asyncio edges of one worker process: thin glue around fanout.core."""
