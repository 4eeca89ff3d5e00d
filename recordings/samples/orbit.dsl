ja-96,none-24,la-96
