"""The original "McCaffrey K-Means++ visualized on MNIST" demo's algorithm, bit for bit: its .NET
random generator, roulette-wheel k-means++, Lloyd loop and stopping rules, on the engine's
executor."""
