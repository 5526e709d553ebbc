// Emulator stand-in for the CUDA header of this name (see tests/emu/emu.h).
#pragma once
#include "../emu.h"
