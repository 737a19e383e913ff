"""The model's fixed numbers, named as in the reference implementation; torch-free, so the pipeline's CPU-only
modules (audio decoding, windowing, config) import them without importing torch."""

# audio hyper-parameters
SAMPLE_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160
CHUNK_LENGTH = 30
N_SAMPLES = CHUNK_LENGTH * SAMPLE_RATE  # 480000 samples in a 30-second window
N_FRAMES = N_SAMPLES // HOP_LENGTH  # 3000 mel frames per window
N_SAMPLES_PER_TOKEN = HOP_LENGTH * 2  # the encoder's second convolution has stride 2
FRAMES_PER_SECOND = SAMPLE_RATE // HOP_LENGTH  # 10 ms per mel frame
TOKENS_PER_SECOND = SAMPLE_RATE // N_SAMPLES_PER_TOKEN  # 20 ms per audio token (encoder position)
TIME_PRECISION = 1 / TOKENS_PER_SECOND  # seconds per timestamp token: 0.02

# what a decode may do
TASKS = ("transcribe", "translate")
